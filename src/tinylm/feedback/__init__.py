"""Feedback: the store of prompts, answers and rankings; guideline labelers; import/export."""
