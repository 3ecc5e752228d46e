"""``python -m modelseal`` runs the command line."""

from modelseal.cli import main

main()
