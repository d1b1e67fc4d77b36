"""Helpers at the bottom of the stack (argument checks, progress bars, the cache folder); they import nothing from
airtrace."""
