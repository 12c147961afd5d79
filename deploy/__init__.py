"""Plateforme's operator side: the CLI, the SkyPilot driver, the local launcher, the sizing
planner and the local OpenAI-compatible endpoint simulator."""
