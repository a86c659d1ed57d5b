from setuptools import find_packages, setup

setup(
    name="gomail",
    version="0.1.0",
    description="Inbound mail (SMTP and HTTP) to signed, retried webhooks, on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gomail", "gomail.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/gomail_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "zope.interface>=6",
        "prometheus-client>=0.20",
        "pyyaml>=6",
        "voluptuous>=0.14",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-cov>=5", "hypothesis>=6.100", "standardwebhooks>=1.0"],
        "dev": ["ruff>=0.6", "mypy>=1.10", "mypy-zope>=1.0", "pytest>=8", "pytest-cov>=5", "hypothesis>=6.100", "standardwebhooks>=1.0"],
    },
    entry_points={"console_scripts": ["gomail = gomail.cli:main"]},
)
