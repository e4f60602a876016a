"""negmerge-bench: the harness. config -> data/models -> candidate pool -> methods -> select -> metrics."""
