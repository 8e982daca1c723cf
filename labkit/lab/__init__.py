"""The lab's machinery: profiles, the notebook runner behind ``./lab run``, notices for notebooks."""
