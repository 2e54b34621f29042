"""The Gradio web UI (arrives with its issue)."""
