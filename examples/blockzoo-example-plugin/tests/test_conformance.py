from blockzoo.testing import conformance_tests
TestConformance = conformance_tests("example.shortconv")
