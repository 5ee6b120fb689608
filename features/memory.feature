@fixture.sqlite
Feature: In-memory databases
  A resource with location ":memory:" is one in-memory database per resource
  name and handler, shared by its plans, which take turns. Its one
  connection lives as long as the handler: idle_timeout never closes it.

  Background:
    Given a database "inventory.db" with an empty items table

  Scenario: Plans share the in-memory database; a rolled-back plan leaves no trace
    Given a database handler with:
      | idle_timeout | 0.3 |
    And the resource "scratch" on ":memory:"
    And the resource "inventory" on "inventory.db"
    When plan "setup" creates the items table in "scratch"
    And plan "setup" adds item "apple" to "scratch"
    And plan "setup" is released
    And plan "spoiler" adds item "pear" to "scratch"
    And plan "spoiler" is rolled back
    And plan "filer" adds item "plum" to "inventory"
    And plan "filer" is released
    Then the handler's open_connections eventually reaches 1
    And plan "reader" sees the items "apple" in "scratch"
    When plan "reader" is released
    And the handler is closed
    Then the handler stats are:
      | open_connections | 0 |
    And no file was created in the scenario's folder but "inventory.db"

  Scenario: Plans take turns on an in-memory database
    Given a database handler
    And the resource "scratch" on ":memory:" with:
      | busy_timeout | 0.2 |
    And plan "first" creates the items table in "scratch"
    When plan "second" tries to add item "pear" to "scratch"
    Then the call fails with ResourceBusyError
    And the error's holder is "first"
    When plan "first" is released
    And plan "second" adds item "pear" to "scratch"
    And plan "second" is released
    Then plan "reader" sees the items "pear" in "scratch"
