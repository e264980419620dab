//! The `whispeer` command line.

fn main() {}
