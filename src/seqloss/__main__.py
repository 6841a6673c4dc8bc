"""``python -m seqloss`` (also what ``torchrun -m seqloss train ...`` runs)."""
from .cli import main

main()
