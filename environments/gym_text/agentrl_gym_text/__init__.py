"""Gymnasium's toy-text games played through text: `gym-frozenlake-v0`, `gym-taxi-v0`,
`gym-blackjack-v0` and `gym-cliffwalking-v0` (registered through entry points)."""
