"""Planning: sample sheet, splits, slide formats. Standard library only: the Snakefile imports
this subpackage while planning, before any rule's environment exists (tests/test_layout.py)."""
