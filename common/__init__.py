"""Ground-floor helpers that every package may import: errors, atomic files, seeding.

Nothing here imports the engine (`utils`) or the data, model and LoRA packages, so
`datasets`, `models` and `lora` depend on this package and never on the engine above them.
"""
