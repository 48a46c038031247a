"""Mock twins of PicoQuant time taggers: T2-mode PTU files the vendor's snAPI replays."""
