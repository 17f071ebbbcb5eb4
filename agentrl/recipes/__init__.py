"""Recipes: commands that build things a run needs, such as a tiny model made from scratch."""
