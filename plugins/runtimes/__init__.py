"""Runtimes: where the timed stages run besides torch (`run.runtime`)."""
