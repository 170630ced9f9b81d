"""Device checks and helper scripts: run the Python ones from the repository root as `python -m scripts.<name>`."""
