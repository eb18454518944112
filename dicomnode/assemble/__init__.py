"""Assembly: when is a study version complete, and which series plays which role (``sequences``)."""
