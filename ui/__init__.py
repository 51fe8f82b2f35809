"""Hotfix Studio's Gradio front end: one module per tab, each with a `render()`; app.py composes them."""
