"""The pure core: money rules, orders, errors and events. No I/O is imported here."""
