"""Prompt and chat templates, installed as the data-only package ``pesocli._templates``."""
