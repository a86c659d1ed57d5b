from twisted.application.service import ServiceMaker

gomail = ServiceMaker("gomail", "gomail.tap", "Inbound mail (SMTP and HTTP) to signed webhooks.", "gomail")
