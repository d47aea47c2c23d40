"""Adapters to the Hugging Face stack. Each module is a plugin or imports its library lazily."""
