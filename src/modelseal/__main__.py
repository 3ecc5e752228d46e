"""``python -m modelseal`` runs the command line."""

from modelseal.cli.main import main

main()
