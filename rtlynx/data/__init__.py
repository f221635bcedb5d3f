"""rtlynx.data"""
