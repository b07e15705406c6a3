"""UnHype for AUTOMATIC1111 1.10+ and Forge: script panel, <unhype:...> tags, UnHype tab."""
