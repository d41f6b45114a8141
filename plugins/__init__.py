"""targetgen's first-party plugins, registered through entry points like any other."""
