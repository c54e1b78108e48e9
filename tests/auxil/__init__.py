"""Shared helpers of the robustness tests: the bot as a subprocess, a fast in-process chat driver,
and the roles a test plays."""
