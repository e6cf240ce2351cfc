"""Research code of the repository (not installed with tlora): the toy-world study and its models."""
