"""Held-out evaluation's numbers and reports, as pure functions over recorded episodes and run files.

`estimators` (pass@k, maj@k, bootstrap intervals), `results` (an evaluation's episodes summed up
per env, and paired comparisons), `markdown` (the summary written next to the results) and
`report` (`agentrl report`: one self-contained HTML page of a run). Nothing here plays an episode
or loads a model: `agentrl.driver.evaluation` does that on the rollout side.
"""
