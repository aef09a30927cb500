"""Using a trained model: prediction CLI, web page, demo."""
