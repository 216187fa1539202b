"""serve: see DESIGN.md."""
