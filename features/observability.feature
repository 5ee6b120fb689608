@fixture.sqlite
Feature: A plan is seen in the traces and metrics a service already collects
  With OpenTelemetry's SDK set up (here: providers that keep everything in
  memory, handed to the handler), each plan is one "cleveragents.plan" span
  from its first call to its end, with its outcome, and the plans and
  checkpoints are counted. The SQL a plan runs, its values and the folders of
  its files are never recorded.

  Background:
    Given a database "inventory.db" with an empty items table
    And the resource "inventory" on "inventory.db"
    And a handler that records into in-memory OpenTelemetry providers

  Scenario: A committed plan is one span, counted as committed
    When plan "restock" takes checkpoint "start" on "inventory"
    And plan "restock" adds item "secret-apple" to "inventory"
    And plan "restock" is released
    Then there is one plan span for "restock", with outcome "committed" and no error
    And the plans counted are 1 "committed"
    And the checkpoints counted are 1

  Scenario: A plan rolled back is one span marked as an error
    When plan "sell" takes checkpoint "start" on "inventory"
    And plan "sell" adds item "secret-pear" to "inventory"
    And plan "sell" is rolled back
    Then there is one plan span for "sell", with outcome "rolled_back" and an error
    And the plans counted are 1 "rolled_back"

  Scenario: Nothing a plan wrote, and no folder, is recorded
    When plan "restock" takes checkpoint "start" on "inventory"
    And plan "restock" adds item "secret-apple" to "inventory"
    And plan "restock" is released
    Then nothing recorded mentions "secret-apple", "INSERT" or the scenario's folder
