"""What the programs share on the command line: the scaffold (flag parsing, checks, exit codes) and the flag groups
that turn flags into the library's configs."""
