"""A small corpus of made-up product manuals for the retrieval tests (nothing in them is true of any real product)."""

from __future__ import annotations

from pathlib import Path

MANUALS = {
    "aurora-x200.md": """# Aurora X200 cordless vacuum

## Charging the battery
Place the X200 on its wall dock. A full charge takes 4 hours from empty. The battery indicator shows three green bars when full.
The battery lasts about 45 minutes on the eco setting and 12 minutes on boost.

## Cleaning the filter
Rinse the foam filter under cold water once a month. Let it dry for 24 hours before putting it back.
Never run the vacuum without the filter: dust will reach the motor.

## Error codes
- E3 (red light blinking): the brush roll is blocked. Switch off and remove hair wrapped around it.
- E5 (red light steady): the motor is too hot. Let the vacuum cool for 30 minutes.
""",
    "nimbus-k7.md": """# Nimbus K7 espresso machine

## Water tank
The removable water tank holds 1.2 litres. Use filtered water to slow down scale build-up.

## Descaling
Descale the K7 every 200 shots, or when the descale light turns orange. Dissolve one sachet of descaler in the tank, then hold the steam button for 5 seconds to start the cycle. The cycle takes 25 minutes.

## Error codes
- F2: the water tank is empty or not seated. Refill it and push it down until it clicks.
- F7: the brew unit is jammed. Contact Nimbus support.
""",
    "tundra-t5.txt": """Tundra T5 smart thermostat

Pairing with Wi-Fi: press and hold the dial for 3 seconds until the screen shows a blinking antenna. Then open the Tundra app and choose Add device. The T5 only supports 2.4 GHz networks.

Batteries: the T5 takes two AAA batteries as a backup during power cuts. Replace them every year.

Factory reset: hold the dial for 10 seconds until the screen turns blue. All schedules are erased.
""",
    "quill-q1.md": """# Quill Q1 e-reader

## Screen care
Wipe the screen with a dry microfibre cloth. Do not use window cleaner.

## Battery safety
If the Q1's battery swells or is damaged, stop using it at once and keep it away from anything that burns: a damaged battery can cause a lithium fire. Take it to an authorised Quill service centre for a replacement.
""",
}


def write_manuals(directory: Path, manuals: dict[str, str] = MANUALS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in manuals.items():
        (directory / name).write_text(text)
    return directory
