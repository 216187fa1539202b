"""cluster: see DESIGN.md."""
