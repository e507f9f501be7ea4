"""Runs: one chunk through every stage, whole runs, the clients they use, their inputs."""
