"""rtlynx.train"""
