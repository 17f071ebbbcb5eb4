"""The Countdown numbers game as `countdown-v0`: single turn, no tools, a verifiable reward."""
