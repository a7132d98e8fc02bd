"""What a push means: sessions, their config, and applying updates through the store."""
