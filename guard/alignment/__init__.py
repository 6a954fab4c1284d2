"""Closing the loop offline: preference pairs from what users said about guard's answers, and reward
models trained on them that best_of_n policies then steer with (`guard export preferences`,
`guard reward train`). Nothing here runs on the request path."""
