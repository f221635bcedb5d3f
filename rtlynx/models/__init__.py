"""rtlynx.models"""
