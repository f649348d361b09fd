"""Where routed experts live and run: tiers, GPU expert cache, prefetch, scheduler."""
