"""The ESMTP receiver: protocol, factory, settings and address parsing."""

from __future__ import annotations

from gomail.smtp.factory import SMTPFactory
from gomail.smtp.protocol import SMTPServerProtocol
from gomail.smtp.settings import SMTPSettings

__all__ = ["SMTPFactory", "SMTPServerProtocol", "SMTPSettings"]
