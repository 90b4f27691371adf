"""What every part of the project imports: BraTS definitions, metrics, losses, recipes,
optimisers and schedules, file writing, figures and progress bars. Imports nothing of the
project."""
