"""The `prism` command line: one module per subcommand (see cli/main.py)."""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"  # the bundled model, from any directory
