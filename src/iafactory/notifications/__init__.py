"""Email: an outbox written in the transaction of the action that causes a message (outbox.py),
the texts in French and English (templates.py), and the senders that deliver it over SMTP or, without
SMTP settings, to the log (sender.py)."""
