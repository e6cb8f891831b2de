"""Floor 3: kinds of task as plug-ins."""
