"""Cryptographic building blocks over ``cryptography``: key schedule, segment AEAD, signatures."""
