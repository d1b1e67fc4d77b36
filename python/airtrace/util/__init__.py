"""Helpers at the bottom of the stack (argument checks, progress bars, the cache folder, "Fix:" hints in the caller's
terms); they import nothing from airtrace."""
