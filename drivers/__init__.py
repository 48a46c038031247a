"""QCoDeS drivers for QKD bench instruments, grouped by vendor, plus role interfaces."""
