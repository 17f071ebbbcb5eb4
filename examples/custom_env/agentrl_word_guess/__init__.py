"""An example agentrl plugin: the `word-guess-v0` env and the `spell` tool (found through entry points)."""
