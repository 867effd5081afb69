"""``python -m captioner`` (also what ``torchrun -m captioner train`` runs)."""

from captioner.cli import main

main()
